"""Who may subscribe: bearer tokens from a file, or JSON Web Tokens, each
with a scope the server applies to every record (auth.mode in [auth])."""
