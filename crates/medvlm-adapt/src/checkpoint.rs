//! checkpoint (to be written).
