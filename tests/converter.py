"""A transparent RS-485-to-Ethernet converter for the tests: TCP on one side, a pty on the other.

One TCP client at a time; its bytes go to the serial device and the device's
back, unchanged (no header), as the converters in front of meter lines do.
Used by the tests of every protocol read over such a converter (Modbus RTU,
IEC 62056-21, DLMS/HDLC).
"""

from __future__ import annotations

import select
import socket
import threading

import serial


class TcpToPty:
    """The converter; a context manager, its TCP port in `port`.

    seven_bit: the serial side set to 7E1, so the meter's 7-bit characters reach
    TCP without their parity bit (the pty carries them 8N1 with parity in bit 7,
    as the simulators send them). `sent` keeps every byte the client sent.
    """

    def __init__(self, device: str, baudrate: int = 9600, seven_bit: bool = False) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.server.getsockname()[1]
        self.line = serial.Serial(device, baudrate, timeout=0)
        self.seven_bit = seven_bit
        self.sent = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tcp-to-pty", daemon=True)

    def _serve(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            # bytes leave the pty as the line paces them: no Nagle wait for each short piece
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with client:
                while not self._stop.is_set():
                    ready, _, _ = select.select([client, self.line.fileno()], [], [], 0.05)
                    if client in ready:
                        data = client.recv(4096)
                        if not data:
                            break  # the client closed: wait for its next connection
                        self.sent += data
                        self.line.write(data)
                    if self.line.fileno() in ready and (data := self.line.read(4096)):
                        client.sendall(bytes(b & 0x7F for b in data) if self.seven_bit else data)

    def __enter__(self) -> TcpToPty:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()
        self.line.close()
