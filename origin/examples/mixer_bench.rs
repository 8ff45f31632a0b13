//! Run the mixer benchmark: `cargo run --release -p amphi-origin --example mixer_bench [-- --smoke]`.

use amphi_origin::bench::{run_mixer_bench, MixerBenchOptions};

fn main() {
    let opts = if std::env::args().any(|a| a == "--smoke") {
        MixerBenchOptions::smoke()
    } else {
        MixerBenchOptions::default()
    };
    match run_mixer_bench(opts) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("mixer bench failed: {e}");
            std::process::exit(1);
        }
    }
}
