"""What several stages share: params schema, prompt format, records, model loading, batching, atomic io."""
