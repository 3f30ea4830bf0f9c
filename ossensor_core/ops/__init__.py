"""Operations: the command line, diagnose, health, metrics, logging, threads, memory."""
