"""Wire formats both ends share: the chunk, pcapng, request signing, Antigena messages."""
