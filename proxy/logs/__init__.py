"""The async log pipeline: LogRecord, the LogQueue with its spool, and the sinks."""
