"""`python -m sdcli` (and `torchrun -m sdcli`) run the command line."""

from sdcli.entry import main

main()
