"""Real-time delivery: one hub per web process, one connection object per socket."""
