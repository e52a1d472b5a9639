"""Reading and rendering data: where rows come from and what they mean, chat templates and label masks, tokenization and its cache, the memory-mapped store."""
