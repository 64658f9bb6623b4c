"""One module per public API: its wire schemas and thin routes over ``serve.generation.service``."""
