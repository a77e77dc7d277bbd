"""The YAML model presets, importable as the package `sslens.presets` so an installed sslens finds them."""
