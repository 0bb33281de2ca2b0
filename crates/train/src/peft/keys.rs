//! PEFT's tensor names in adapter_model.safetensors (adapter name stripped, as
//! `save_pretrained` writes them) for the five decoder families, whose HF causal-LM classes
//! all hold `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj` and `lm_head`.

use model::{Lora, LoraTarget};

/// What PEFT's `PeftModelForCausalLM` puts in front of the HF module path.
const PREFIX: &str = "base_model.model.";

/// The HF module path of `target` (in `layer` for per-layer targets), e.g.
/// `model.layers.3.self_attn.q_proj`.
pub fn module_path(target: LoraTarget, layer: Option<usize>) -> String {
    let i = layer.unwrap_or(0);
    let name = target.hf_name();
    match target {
        LoraTarget::EmbedTokens => "model.embed_tokens".into(),
        LoraTarget::LmHead => "lm_head".into(),
        LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
            format!("model.layers.{i}.self_attn.{name}")
        }
        LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => {
            format!("model.layers.{i}.mlp.{name}")
        }
    }
}

/// The names of a module's A and B tensors. Linear: `<path>.lora_A.weight` [R, in] and
/// `<path>.lora_B.weight` [out, R]; embedding: `<path>.lora_embedding_A` [R, V] and
/// `<path>.lora_embedding_B` [C, R] (PEFT keeps those as bare parameters: no `.weight`).
pub fn lora_tensor_names(target: LoraTarget, layer: Option<usize>) -> [String; 2] {
    let base = format!("{PREFIX}{}", module_path(target, layer));
    if target == LoraTarget::EmbedTokens {
        [
            format!("{base}.lora_embedding_A"),
            format!("{base}.lora_embedding_B"),
        ]
    } else {
        [
            format!("{base}.lora_A.weight"),
            format!("{base}.lora_B.weight"),
        ]
    }
}

/// The adapter's tensors as an optimizer registers them (crate::optim::AdamW::new): PEFT's
/// tensor names with their lengths, in [`Lora::pairs`] order, A before B. transformers'
/// decay rule puts every one of them in the weight-decay group.
pub fn lora_parameters(lora: &Lora) -> Vec<(String, usize)> {
    lora.pairs()
        .into_iter()
        .flat_map(|(layer, target, pair)| {
            let [a, b] = lora_tensor_names(target, layer);
            [(a, pair.a.len()), (b, pair.b.len())]
        })
        .collect()
}

/// Whether `name` is one of the full base weights PEFT dumps beside the LoRA tensors when
/// embed_tokens or lm_head is targeted (`save_embedding_layers="auto"`): the wrapped layer's
/// `base_layer.weight`, or the plain `weight` of an unwrapped embedding or head.
pub fn is_base_weight_dump(name: &str) -> bool {
    let Some(path) = name.strip_prefix(PREFIX) else {
        return false;
    };
    [
        "model.embed_tokens.base_layer.weight",
        "model.embed_tokens.weight",
        "lm_head.base_layer.weight",
        "lm_head.weight",
    ]
    .contains(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_peft() {
        assert_eq!(
            lora_tensor_names(LoraTarget::QProj, Some(2)),
            [
                "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight",
                "base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"
            ]
        );
        assert_eq!(
            lora_tensor_names(LoraTarget::DownProj, Some(0))[1],
            "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
        );
        assert_eq!(
            lora_tensor_names(LoraTarget::EmbedTokens, None),
            [
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "base_model.model.model.embed_tokens.lora_embedding_B"
            ]
        );
        assert_eq!(
            lora_tensor_names(LoraTarget::LmHead, None)[0],
            "base_model.model.lm_head.lora_A.weight"
        );
        assert!(is_base_weight_dump(
            "base_model.model.lm_head.base_layer.weight"
        ));
        assert!(is_base_weight_dump(
            "base_model.model.model.embed_tokens.base_layer.weight"
        ));
        assert!(!is_base_weight_dump(
            "base_model.model.lm_head.lora_A.weight"
        ));
        assert!(!is_base_weight_dump("model.embed_tokens.weight"));
    }

    #[test]
    fn optimizer_parameters_are_peft_names_a_before_b_and_all_decay() {
        let cfg = model::ModelConfig::from_json_str(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2}"#,
            std::path::Path::new("config.json"),
        )
        .unwrap();
        let spec = model::LoraSpec {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            use_rslora: false,
            targets: vec![LoraTarget::LmHead, LoraTarget::UpProj],
        };
        let params = lora_parameters(&Lora::zeros(spec, &cfg).unwrap());
        let want = [
            (
                "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                2 * 8,
            ),
            (
                "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
                12 * 2,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight",
                2 * 8,
            ),
            (
                "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight",
                12 * 2,
            ),
            ("base_model.model.lm_head.lora_A.weight", 2 * 8),
            ("base_model.model.lm_head.lora_B.weight", 10 * 2),
        ];
        assert_eq!(params, want.map(|(n, l)| (n.to_string(), l)).to_vec());
        assert!(params.iter().all(|(n, _)| crate::optim::decays(n)));
    }
}
