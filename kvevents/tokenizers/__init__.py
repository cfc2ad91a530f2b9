"""Prompt tokenizers: the router renders and tokenizes a request exactly as its engine does.

``base`` (the protocol and the built-in tokenizer the simulated engines share), ``hf``
(Hugging Face ``tokenizer.json`` + chat template), ``engine`` (the engine's ``/tokenize``),
``prefix_cache`` (token ids of shared prompt prefixes), ``factory`` (a config string -> one).
"""
