//! medvlm-eval
