//! Property tests for address and token parsing: many generated inputs, a
//! fixed seed (so a failure repeats), properties that must hold for all.

use imip_milter::address::{token_prefix, valid_token_syntax, BaseAddress, GatewayAddresses, Recipient};

/// xorshift64*: small, deterministic, good enough to spread inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick(&mut self, s: &[char]) -> char {
        s[self.below(s.len())]
    }
}

const TOKEN_CHARS: &[char] = &['a', 'b', 'z', 'A', 'Q', 'Z', '0', '5', '9', '-', '_', '.', '='];
/// Everything that may turn up in an RCPT argument, hostile included.
const ANY_CHARS: &[char] = &[
    'a', 'C', '0', '+', '-', '@', '<', '>', '"', '\\', ':', ',', ' ', '\t', '\r', '\n', '\0', 'é', '€', '.', '=', '%',
    '/', '!',
];

fn gateway() -> GatewayAddresses {
    GatewayAddresses::new(
        vec![
            BaseAddress::parse("calendar@example.org").unwrap(),
            BaseAddress::parse("replies@example.net").unwrap(),
        ],
        "+-",
    )
}

fn random_case(rng: &mut Rng, s: &str) -> String {
    s.chars()
        .map(|c| if rng.below(2) == 0 { c.to_ascii_uppercase() } else { c })
        .collect()
}

#[test]
fn every_valid_token_is_taken_back_exactly() {
    let gw = gateway();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _ in 0..20_000 {
        let len = 8 + rng.below(57);
        let token: String = (0..len).map(|_| rng.pick(TOKEN_CHARS)).collect();
        assert!(valid_token_syntax(&token), "{token}");
        let (base, domain) = if rng.below(2) == 0 {
            ("calendar", "example.org")
        } else {
            ("replies", "example.net")
        };
        let delimiter = if rng.below(2) == 0 { '+' } else { '-' };
        let rcpt = format!(
            "<{}{delimiter}{token}@{}>",
            random_case(&mut rng, base),
            random_case(&mut rng, domain)
        );
        // A token starting with a delimiter belongs to nobody: base+-x is base, delimiter, "-x".
        assert_eq!(
            gw.classify(&rcpt),
            Recipient::Gateway { token: token.clone() },
            "{rcpt}"
        );
        let shown = gw.redact(&rcpt);
        assert!(
            !shown.contains(&token[..token.len().min(9)]) || token.len() <= 8,
            "{shown}"
        );
        assert!(token.starts_with(token_prefix(&token).trim_end_matches('…')));
    }
}

#[test]
fn any_input_classifies_without_panic_and_tokens_are_well_formed() {
    let gw = gateway();
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut gateways = 0;
    for i in 0..50_000 {
        let len = rng.below(90);
        let mut s: String = (0..len).map(|_| rng.pick(ANY_CHARS)).collect();
        // Steer a share of the inputs near real gateway addresses.
        if i % 3 == 0 {
            let tail: String = (0..rng.below(70))
                .map(|_| {
                    if rng.below(20) == 0 {
                        rng.pick(ANY_CHARS)
                    } else {
                        rng.pick(TOKEN_CHARS)
                    }
                })
                .collect();
            s = format!("<calendar+{tail}@example.org>");
        }
        match gw.classify(&s) {
            Recipient::Gateway { token } => {
                gateways += 1;
                assert!(valid_token_syntax(&token), "{s:?} gave {token:?}");
                assert!(s.contains(&token), "{s:?}");
            }
            Recipient::GatewayWithoutToken | Recipient::GatewayBadToken | Recipient::Other => {}
        }
        let shown = gw.redact(&s);
        assert!(!shown.chars().any(char::is_control), "log line injection: {shown:?}");
        assert!(shown.len() <= 400, "{shown}");
    }
    assert!(gateways > 0, "the generator reaches valid gateway addresses");
}

#[test]
fn bad_tokens_are_never_accepted() {
    let gw = gateway();
    let mut rng = Rng(42);
    for _ in 0..20_000 {
        let len = rng.below(80);
        let token: String = (0..len).map(|_| rng.pick(ANY_CHARS)).collect();
        let rcpt = format!("<calendar+{token}@example.org>");
        if let Recipient::Gateway { token: t } = gw.classify(&rcpt) {
            assert!(valid_token_syntax(&t) && (8..=64).contains(&t.len()), "{rcpt:?}");
        }
    }
}
