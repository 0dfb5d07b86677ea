"""The machine a run is on: its malloc (allocator), the memory it lets a run use and the process's peak (memory),
AdamW's moments kept in a file (offload), and starting the command on several local processes (launch)."""
