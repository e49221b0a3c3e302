//! appliance-bus (skeleton; being written).
