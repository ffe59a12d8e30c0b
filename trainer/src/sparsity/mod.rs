//! Everything that keeps the FFN sparse and exploits it: the lambda schedule and the
//! per-layer FFN path choice ([`paths`]), activity statistics ([`activity`]), dead units and
//! their re-initialisation ([`dead_units`]), and the physical repack that removes them
//! ([`repack`]).
pub mod activity;
pub mod dead_units;
pub mod paths;
pub mod repack;
