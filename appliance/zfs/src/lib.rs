//! appliance-zfs (skeleton; being written).
