"""Host side of the one host<->guest channel: multiplexes control RPC and process streams."""
