"""The bodies of the `fastdiss` commands, one module per command (fastdiss.cli parses the arguments
and calls `run(args)` of the module). User mistakes raise fastdiss.userio.CLIError."""
