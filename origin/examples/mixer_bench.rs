//! Run the mixer benchmark: `cargo run --release -p amphi-origin --example mixer_bench [-- --smoke]`.

use amphi_origin::bench::{run_mixer_bench, MixerBenchOptions};

fn main() {
    let smoke = std::env::args().any(|a| a == "--smoke");
    match run_mixer_bench(MixerBenchOptions {
        smoke,
        ..MixerBenchOptions::default()
    }) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("mixer bench failed: {e}");
            std::process::exit(1);
        }
    }
}
