//! method (to be written).
