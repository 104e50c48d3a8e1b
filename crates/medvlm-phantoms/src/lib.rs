//! medvlm-phantoms
