"""The MQTT collector: the broker client, the consumer, decoding of messages, the ingestion worker processes."""
