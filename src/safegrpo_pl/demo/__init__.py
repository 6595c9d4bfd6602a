"""The built-in demo set: drawn objects and typographic text in the demo's own vocabulary."""
