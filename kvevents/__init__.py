"""Engine-facing KV-cache events: wire codecs, subscribers, block keys, tokenizers."""
