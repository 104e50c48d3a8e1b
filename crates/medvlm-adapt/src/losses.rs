//! losses (to be written).
