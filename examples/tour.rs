//! The tour: what each sd crate does, run on in-memory backends, no server needed.
//!
//! `cargo run -p sd-examples --example tour`

use sd_examples::CRATES;

fn main() {
    println!("sd: system-design patterns for Rust services\n");
    let width = CRATES.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for krate in CRATES {
        println!("{:width$}  {}", krate.name, krate.pattern);
        println!("{:width$}  today: {}\n", "", krate.today);
    }
    let ready = CRATES
        .iter()
        .filter(|c| !c.today.starts_with("planned"))
        .count();
    println!(
        "{ready} of {} crates have a scenario to run today.",
        CRATES.len()
    );
}
