"""Command-line tools: cmfast-train, cmfast-sample, cmfast-edit, cmfast-eval."""
