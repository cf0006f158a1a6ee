"""`faasmoe serve` / `faasmoe frontend`: the serve config, device resolution and the process that
runs scheduler, local pool and frontend together."""
