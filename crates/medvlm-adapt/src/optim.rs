//! optim (to be written).
