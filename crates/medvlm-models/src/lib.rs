//! medvlm-models
