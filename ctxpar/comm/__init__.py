"""Process groups, autograd-safe collectives and rank discovery; imports nothing else of ctxpar."""
