//! appliance-record-log (skeleton; being written).
