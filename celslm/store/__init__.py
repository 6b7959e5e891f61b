"""Where artifacts live besides a plain directory: a local store (the server's and the edge's cache),
an HTTP client for serve-cache, and the tiered lookup local -> peers -> cloud."""
