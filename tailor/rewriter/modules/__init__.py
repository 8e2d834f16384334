"""torch modules that rewrites install in a transformers model (constant branches, shared-KV
attention, per-head sparse attention), and the hook through which tailor's generation runtime
drives them."""
