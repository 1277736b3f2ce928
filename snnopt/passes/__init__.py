"""Graph passes of the snnopt compiler (one pass per file; see pipeline order in the compiler issue)."""
