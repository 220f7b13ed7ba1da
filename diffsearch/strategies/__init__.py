"""Search strategies: ask/tell objects that never touch a model or a cluster."""
