//! One file per adaptation method.
