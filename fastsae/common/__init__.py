"""What every stage shares: configs from script constants, user errors, devices, torchrun ranks, atomic files."""
