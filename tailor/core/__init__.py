"""The core: what every layer shares (errors, plans, attention patterns, targets, the cache
directory, digests). It imports nothing else of tailor."""
