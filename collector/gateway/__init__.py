"""The gateway: the poll scheduler with its per-bus queues, the spool, the uplink, the daemon that joins them."""
