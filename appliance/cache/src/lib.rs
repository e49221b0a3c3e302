//! appliance-cache (skeleton; being written).
