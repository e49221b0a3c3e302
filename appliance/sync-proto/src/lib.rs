//! appliance-sync-proto (skeleton; being written).
