"""Built-in passes, one module each; registered by ``presso.plugins.builtin``."""
