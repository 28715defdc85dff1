"""Sans-IO HTTP parsers: per-connection byte streams in, HTTP events out."""
