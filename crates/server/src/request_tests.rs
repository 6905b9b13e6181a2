use axum::http::StatusCode;
use serde_json::json;

use super::*;

fn models() -> Vec<ModelCard> {
    vec![
        ModelCard {
            name: "small".into(),
            context_length: 64,
            sampling: Default::default(),
        },
        ModelCard {
            name: "big".into(),
            context_length: 128,
            sampling: Default::default(),
        },
        ModelCard {
            name: "tuned".into(),
            context_length: 128,
            sampling: SamplingDefaults {
                temperature: Some(0.2),
                top_k: Some(40),
                ..Default::default()
            },
        },
    ]
}

#[test]
fn a_models_recipe_fills_the_sampling_fields_a_request_leaves_out() {
    let r =
        chat(json!({"model": "tuned", "messages": [{"role": "user", "content": "Hi"}]})).unwrap();
    assert_eq!(r.generate.sampling.temperature, 0.2);
    assert_eq!(r.generate.sampling.top_k, 40);
    assert_eq!(r.generate.sampling.top_p, 1.0);
    let r = chat(json!({"model": "tuned", "temperature": 0.9, "top_p": 0.5,
        "messages": [{"role": "user", "content": "Hi"}]}))
    .unwrap();
    assert_eq!(r.generate.sampling.temperature, 0.9);
    assert_eq!(r.generate.sampling.top_k, 40);
    assert_eq!(r.generate.sampling.top_p, 0.5);
    // Another model keeps OpenAI's defaults.
    let r = chat(json!({"model": "big", "messages": [{"role": "user", "content": "Hi"}]})).unwrap();
    assert_eq!(r.generate.sampling.temperature, 1.0);
    assert_eq!(r.generate.sampling.top_k, 0);
}

fn chat(v: Value) -> ApiResult<ApiRequest> {
    parse_chat(v.to_string().as_bytes(), &models())
}

fn completion(v: Value) -> ApiResult<ApiRequest> {
    parse_completion(v.to_string().as_bytes(), &models())
}

/// The error's field and a piece of its message.
fn refused(r: ApiResult<ApiRequest>) -> (Option<String>, String) {
    let e = r.unwrap_err();
    assert_eq!(e.status, StatusCode::BAD_REQUEST, "{e:?}");
    (e.param, e.message)
}

#[test]
fn a_full_chat_request_becomes_a_generate_request() {
    let r = chat(json!({
        "model": "big",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}
        ],
        "temperature": 0.5, "top_p": 0.9, "max_completion_tokens": 7, "max_tokens": 99,
        "stop": ["\n\n", "END"], "seed": 42, "n": 1, "stream": true,
        "stream_options": {"include_usage": true},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        "user": "someone", "logprobs": false, "presence_penalty": 0
    }))
    .unwrap();
    assert_eq!(r.model, "big");
    assert_eq!(r.generate.model.as_deref(), Some("big"));
    assert_eq!(r.max_tokens, Some(7));
    assert!(r.stream && r.include_usage);
    let g = &r.generate;
    assert_eq!(g.sampling.temperature, 0.5);
    assert_eq!(g.sampling.top_p, 0.9);
    assert_eq!(g.sampling.seed, 42);
    assert_eq!(g.stop_strings, vec!["\n\n", "END"]);
    assert_eq!(
        g.constraint,
        Some(Constraint::JsonSchema(json!({"type": "object"})))
    );
    let Prompt::Chat(msgs) = &g.prompt else {
        panic!("chat prompt expected")
    };
    assert_eq!(msgs[0], ChatMessage::system("Be brief."));
    assert_eq!(msgs[1], ChatMessage::user("Hi!"));
}

#[test]
fn defaults_are_openais() {
    let r = chat(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
    assert_eq!(r.model, "small");
    assert_eq!(r.max_tokens, None);
    assert_eq!(r.generate.sampling.temperature, 1.0);
    assert!(!r.stream && !r.include_usage);
    assert_eq!(r.generate.constraint, None);
    let r = chat(json!({"messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_object"}, "stop": "END"}))
    .unwrap();
    assert_eq!(r.generate.constraint, Some(Constraint::Json));
    assert_eq!(r.generate.stop_strings, vec!["END"]);
}

#[test]
fn completion_prompts_take_openais_shapes() {
    let p = |v: Value| completion(json!({"prompt": v})).map(|r| r.generate.prompt);
    assert!(matches!(p(json!("def f():")).unwrap(), Prompt::Text(t) if t == "def f():"));
    assert!(matches!(p(json!(["x"])).unwrap(), Prompt::Text(t) if t == "x"));
    assert!(matches!(p(json!([1, 2, 3])).unwrap(), Prompt::Tokens(t) if t == [1, 2, 3]));
    assert!(matches!(p(json!([[4, 5]])).unwrap(), Prompt::Tokens(t) if t == [4, 5]));
    assert!(refused(p(json!(["a", "b"])).map(|_| unreachable!()))
        .1
        .contains("one prompt"));
    assert_eq!(
        refused(completion(json!({"prompt": 3}))).0.as_deref(),
        Some("prompt")
    );
    assert_eq!(
        refused(completion(json!({"prompt": [-1]}))).0.as_deref(),
        Some("prompt")
    );
    assert_eq!(refused(completion(json!({}))).1, "`prompt` is required");
    assert_eq!(
        refused(completion(json!({"prompt": "x", "echo": true})))
            .0
            .as_deref(),
        Some("echo")
    );
}

#[test]
fn logprobs_are_asked_as_each_endpoint_asks() {
    let msgs = json!([{"role": "user", "content": "x"}]);
    let lp = |v: Value| chat(v).unwrap().generate.logprobs;
    assert_eq!(lp(json!({"messages": msgs})), None);
    assert_eq!(lp(json!({"messages": msgs, "logprobs": false})), None);
    assert_eq!(lp(json!({"messages": msgs, "logprobs": true})), Some(0));
    assert_eq!(
        lp(json!({"messages": msgs, "logprobs": true, "top_logprobs": 5})),
        Some(5)
    );
    let (p, m) = refused(chat(
        json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
    ));
    assert_eq!(p.as_deref(), Some("top_logprobs"));
    assert!(m.contains("between 0 and 20"), "{m}");
    let lp = |v: Value| completion(v).unwrap().generate.logprobs;
    assert_eq!(lp(json!({"prompt": "x", "logprobs": 3})), Some(3));
    assert_eq!(lp(json!({"prompt": "x", "logprobs": 0})), Some(0));
    assert_eq!(lp(json!({"prompt": "x"})), None);
    let (p, _) = refused(completion(json!({"prompt": "x", "logprobs": 99})));
    assert_eq!(p.as_deref(), Some("logprobs"));
}

#[test]
fn tools_and_their_messages_reach_the_engine() {
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let r = chat(json!({
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3 C"}
        ],
        "tools": tools, "tool_choice": "required"
    }))
    .unwrap();
    let t = r.tools.as_ref().unwrap();
    assert!(t.parsed());
    assert_eq!(r.generate.tools.len(), 1);
    assert!(
        matches!(&r.generate.constraint, Some(Constraint::Lark(g)) if g.contains("get_weather"))
    );
    let Prompt::Chat(msgs) = &r.generate.prompt else {
        panic!()
    };
    assert_eq!(msgs[1].content, "");
    assert_eq!(msgs[1].tool_calls[0].function.name, "get_weather");
    assert_eq!(
        msgs[1].tool_calls[0].function.arguments,
        json!({"city": "Oslo"})
    );
    assert_eq!(msgs[2].role, "tool");
    assert_eq!(msgs[2].tool_call_id.as_deref(), Some("call_1"));
    // tool_choice none: the template still sees the tools; nothing is constrained or parsed.
    let r = chat(
        json!({"messages": [{"role": "user", "content": "x"}], "tools": tools,
        "tool_choice": "none"}),
    )
    .unwrap();
    assert!(!r.tools.unwrap().parsed() && r.generate.constraint.is_none());
    assert_eq!(r.generate.tools.len(), 1);
    // Two constraints on one output are refused.
    let (p, _) = refused(chat(json!({"messages": [{"role": "user", "content": "x"}],
        "tools": tools, "response_format": {"type": "json_object"}})));
    assert_eq!(p.as_deref(), Some("tools"));
    // Tools belong to chat.
    let (p, _) = refused(completion(json!({"prompt": "x", "tools": tools})));
    assert_eq!(p.as_deref(), Some("tools"));
}

#[test]
fn a_suffix_makes_a_fill_in_the_middle_prompt() {
    let r = completion(json!({"prompt": "def f(x):\n    ", "suffix": "\n    return y\n"})).unwrap();
    assert!(matches!(&r.generate.prompt,
        Prompt::Infill { prefix, suffix } if prefix == "def f(x):\n    " && suffix == "\n    return y\n"));
    // An empty suffix is plain completion; token prompts cannot take one.
    let r = completion(json!({"prompt": "x", "suffix": ""})).unwrap();
    assert!(matches!(r.generate.prompt, Prompt::Text(_)));
    let (p, _) = refused(completion(json!({"prompt": [1, 2], "suffix": "y"})));
    assert_eq!(p.as_deref(), Some("suffix"));
}

#[test]
fn each_bad_field_is_named() {
    let base = || json!({"messages": [{"role": "user", "content": "x"}]});
    let with = |k: &str, v: Value| {
        let mut b = base();
        b[k] = v;
        chat(b)
    };
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "temperature",
            json!("hot"),
            "temperature",
            "must be a number, not a string",
        ),
        ("temperature", json!(3), "temperature", "[0, 2]"),
        ("top_p", json!(0), "top_p", "(0, 1]"),
        ("max_tokens", json!(0), "max_tokens", "at least 1"),
        ("max_tokens", json!(-5), "max_tokens", "whole number >= 0"),
        ("max_tokens", json!("10"), "max_tokens", "not a string"),
        ("n", json!(17), "n", "between 1 and 16"),
        ("n", json!(0), "n", "between 1 and 16"),
        ("stop", json!(5), "stop", "string or an array of strings"),
        ("stop", json!([1]), "stop", "string or an array of strings"),
        ("seed", json!(1.5), "seed", "whole number"),
        ("stream", json!("yes"), "stream", "boolean"),
        ("min_p", json!(1.0), "min_p", "[0, 1)"),
        ("top_logprobs", json!(3), "top_logprobs", "needs `logprobs`"),
        ("logprobs", json!(1), "logprobs", "a boolean"),
        (
            "tools",
            json!([{"type": "function"}]),
            "tools[0].function",
            "required",
        ),
        (
            "tool_choice",
            json!("required"),
            "tool_choice",
            "no function",
        ),
        (
            "presence_penalty",
            json!(0.5),
            "presence_penalty",
            "not supported",
        ),
        (
            "stream_options",
            json!({"include_usage": 1}),
            "stream_options.include_usage",
            "boolean",
        ),
        (
            "response_format",
            json!({"type": "xml"}),
            "response_format.type",
            "xml",
        ),
        (
            "response_format",
            json!({"type": "json_schema"}),
            "response_format.json_schema",
            "required",
        ),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {"schema": "x"}}),
            "response_format.json_schema.schema",
            "JSON schema object",
        ),
        ("messages", json!([]), "messages", "at least one"),
        ("messages", json!("hi"), "messages", "an array"),
        (
            "messages",
            json!([{"role": "robot", "content": "x"}]),
            "messages[0].role",
            "`robot`",
        ),
        (
            "messages",
            json!([{"role": "user", "content": "x", "tool_calls": []}]),
            "messages[0].tool_calls",
            "assistant messages",
        ),
        (
            "messages",
            json!([{"role": "assistant", "tool_calls": [{"id": "c", "type": "function"}]}]),
            "messages[0].tool_calls[0].function",
            "required",
        ),
        (
            "messages",
            json!([{"content": "x"}]),
            "messages[0].role",
            "required",
        ),
        (
            "messages",
            json!([{"role": "user"}]),
            "messages[0].content",
            "required",
        ),
        (
            "messages",
            json!([{"role": "user", "content": 7}]),
            "messages[0].content",
            "a number",
        ),
        (
            "messages",
            json!([{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content[0].type",
            "image_url",
        ),
        ("model", json!(7), "model", "a string"),
    ];
    for (key, value, param, msg) in cases {
        let (p, m) = refused(with(key, value.clone()));
        assert_eq!(p.as_deref(), Some(param), "{key}: {value}: {m}");
        assert!(m.contains(msg), "{key}: {value}: `{m}` lacks `{msg}`");
    }
}

#[test]
fn an_unknown_model_is_404_and_lists_the_loaded_ones() {
    let e = chat(json!({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}))
        .unwrap_err();
    assert_eq!(e.status, StatusCode::NOT_FOUND);
    assert_eq!(e.param.as_deref(), Some("model"));
    assert_eq!(e.code, Some("model_not_found"));
    assert!(e.message.contains("`gpt-4`") && e.message.contains("small, big"));
}

#[test]
fn malformed_json_is_refused_before_anything_else() {
    let e = parse_chat(b"{\"messages\": [", &models()).unwrap_err();
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert!(e.message.contains("not valid JSON"), "{}", e.message);
}

#[test]
fn huge_numbers_are_refused_by_name_not_wrapped() {
    let msgs = json!([{"role": "user", "content": "x"}]);
    let with = |k: &str, v: Value| {
        let mut b = json!({"messages": msgs});
        b[k] = v;
        chat(b)
    };
    // 2^64-1 would wrap the engine's `prompt + max_tokens` check in a release build.
    for k in ["max_tokens", "max_completion_tokens"] {
        let e = with(k, json!(u64::MAX)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(k));
        assert_eq!(e.code, Some("context_length_exceeded"));
        assert!(
            e.message.contains("18446744073709551615") && e.message.contains("64"),
            "{}",
            e.message
        );
        assert!(with(k, json!(65)).is_err());
        assert_eq!(with(k, json!(64)).unwrap().max_tokens, Some(64));
    }
    // The context checked is the named model's.
    let r = chat(json!({"model": "big", "messages": msgs, "max_tokens": 128})).unwrap();
    assert_eq!(r.max_tokens, Some(128));
    // Floats past f32 would become infinity; integers past the type are refused.
    for (k, v) in [
        ("temperature", json!(1e39)),
        ("top_p", json!(-1e300)),
        ("min_p", json!(1e300)),
        ("repetition_penalty", json!(1e39)),
        ("dry_multiplier", json!(3.5e38)),
        ("dry_base", json!(1e300)),
        ("presence_penalty", json!(1e40)),
    ] {
        let e = with(k, v.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(k), "{k}={v}: {e:?}");
    }
    for (k, v) in [
        ("seed", json!(-1)),
        ("top_k", json!(1.5)),
        ("n", json!(u64::MAX)),
        ("dry_penalty_last_n", json!(i64::MIN)),
        ("dry_penalty_last_n", json!(u64::MAX)),
        ("dry_allowed_length", json!(0)),
    ] {
        let e = with(k, v.clone()).unwrap_err();
        assert_eq!(e.param.as_deref(), Some(k), "{k}={v}: {e:?}");
    }
    // Huge but meaningful values pass and saturate.
    let r = with("top_k", json!(u64::MAX)).unwrap();
    assert_eq!(r.generate.sampling.top_k, usize::MAX);
    let r = with("seed", json!(u64::MAX)).unwrap();
    assert_eq!(r.generate.sampling.seed, u64::MAX);
}

#[test]
fn stop_strings_are_capped_in_length_not_only_number() {
    let msgs = json!([{"role": "user", "content": "x"}]);
    let stop = |v: Value| chat(json!({"messages": msgs, "stop": v}));
    let long = "x".repeat(MAX_STOP_BYTES + 1);
    let (p, m) = refused(stop(json!(long)));
    assert_eq!(p.as_deref(), Some("stop"));
    assert!(m.contains("1024 bytes") && m.contains("1025"), "{m}");
    let (p, _) = refused(stop(json!(["a", long])));
    assert_eq!(p.as_deref(), Some("stop"));
    // Five at the per-string cap pass the per-string check but not the total.
    let five = vec!["y".repeat(MAX_STOP_BYTES); 5];
    let (p, m) = refused(stop(json!(five)));
    assert_eq!(p.as_deref(), Some("stop"));
    assert!(m.contains("4096 bytes together"), "{m}");
    let four = vec!["y".repeat(MAX_STOP_BYTES); 4];
    assert_eq!(stop(json!(four)).unwrap().generate.stop_strings.len(), 4);
    // Multi-byte characters count in bytes.
    let (p, _) = refused(stop(json!("é".repeat(513))));
    assert_eq!(p.as_deref(), Some("stop"));
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

mod props {
    use super::*;
    use proptest::prelude::*;

    /// Any number: integers of every size and sign, and floats of every magnitude.
    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |x| x.is_finite())
                .prop_map(Value::from),
            (0u32..40).prop_map(|e| Value::from(2f64.powi(e as i32 * 8))),
        ]
    }

    const FIELDS: [&str; 16] = [
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "dry_multiplier",
        "dry_base",
        "dry_allowed_length",
        "dry_penalty_last_n",
        "seed",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Any numbers in any fields: an error names a field that was given, or the request
        /// is valid, within the context, with finite sampling parameters.
        #[test]
        fn prop_client_numbers_are_checked_never_wrapped(
            given in proptest::collection::vec((0..FIELDS.len(), number()), 1..5),
            completion_endpoint in any::<bool>(),
        ) {
            let mut body = json!({"messages": [{"role": "user", "content": "x"}], "prompt": "x"});
            for (i, v) in &given {
                body[FIELDS[*i]] = v.clone();
            }
            let r = if completion_endpoint {
                body.as_object_mut().unwrap().remove("messages");
                completion(body)
            } else {
                body.as_object_mut().unwrap().remove("prompt");
                chat(body)
            };
            match r {
                Ok(r) => {
                    prop_assert!(r.max_tokens.is_none_or(|n| (1..=64).contains(&n)));
                    let s = &r.generate.sampling;
                    prop_assert!(s.validate().is_ok());
                    for x in [s.temperature, s.top_p, s.min_p, s.repetition_penalty, s.dry_multiplier, s.dry_base] {
                        prop_assert!(x.is_finite());
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    let p = e.param.clone().unwrap_or_default();
                    prop_assert!(given.iter().any(|(i, _)| FIELDS[*i] == p), "{:?} names no given field", e);
                }
            }
        }
    }
}

#[test]
fn a_regex_or_a_lark_grammar_constrains_the_output_and_only_one_constraint_is_taken() {
    let base = json!({"model": "small", "messages": [{"role": "user", "content": "Hi"}]});
    let with = |extra: Value| {
        let mut v = base.clone();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };
    let r = chat(with(json!({"regex": "[0-9]{3}"}))).unwrap();
    assert_eq!(
        r.generate.constraint,
        Some(Constraint::Regex("[0-9]{3}".into()))
    );
    let lark = "start: \"yes\" | \"no\"";
    let r = completion(json!({"model": "small", "prompt": "Hi", "grammar": lark})).unwrap();
    assert_eq!(r.generate.constraint, Some(Constraint::Lark(lark.into())));
    for (extra, field, says) in [
        (
            json!({"regex": "a", "grammar": lark}),
            "grammar",
            "both constrain",
        ),
        (
            json!({"response_format": {"type": "json_object"}, "regex": "a"}),
            "regex",
            "both constrain",
        ),
        (json!({"regex": "  "}), "regex", "empty"),
        (json!({"grammar": 3}), "grammar", "a string"),
        (
            json!({"grammar": "x".repeat(MAX_GRAMMAR_BYTES + 1)}),
            "grammar",
            "at most",
        ),
    ] {
        let (param, msg) = refused(chat(with(extra.clone())));
        assert_eq!(param.as_deref(), Some(field), "{extra}: {msg}");
        assert!(msg.contains(says), "{extra}: {msg}");
    }
    // vLLM's names are the same fields; its other guided_* are refused, not ignored.
    let r = chat(with(json!({"guided_regex": "[a-z]+"}))).unwrap();
    assert_eq!(
        r.generate.constraint,
        Some(Constraint::Regex("[a-z]+".into()))
    );
    let r = chat(with(json!({"guided_grammar": lark}))).unwrap();
    assert_eq!(r.generate.constraint, Some(Constraint::Lark(lark.into())));
    for name in ["guided_json", "guided_choice"] {
        let (param, msg) = refused(chat(with(json!({name: ["a"]}))));
        assert_eq!(param.as_deref(), Some(name), "{msg}");
    }
    // A text response_format is no constraint, so it goes with a regex.
    let r = chat(with(
        json!({"response_format": {"type": "text"}, "regex": "a+"}),
    ))
    .unwrap();
    assert_eq!(r.generate.constraint, Some(Constraint::Regex("a+".into())));
}
