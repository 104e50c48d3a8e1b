//! medvlm-adapt
