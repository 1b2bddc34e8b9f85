"""Quality metrics in any script (Django-free)."""

import pytest

from tuna_llm import metrics

ANSWERS = {
    "cyrillic": "Заказ содержит две синие рубашки и красную шляпу.",
    "greek": "Η παραγγελία περιέχει δύο μπλε πουκάμισα.",
    "chinese": "订单四十二包含两件蓝色衬衫和一顶红帽子。",
    "japanese": "注文には青いシャツが二枚と赤い帽子が一つ入っています。",
    "korean": "주문에는 파란 셔츠 두 장이 들어 있습니다.",
    "thai": "คำสั่งซื้อนี้มีเสื้อสีน้ำเงินสองตัว",
}


@pytest.mark.parametrize("language", ANSWERS)
def test_it_scores_identical_answers_in_any_script_as_a_full_match(language):
    answer = ANSWERS[language]
    assert metrics.rouge_l(answer, answer) == pytest.approx(1.0)
    assert metrics.exact_match(answer, answer) == 1.0
    assert metrics.bleu(answer, answer) == pytest.approx(1.0)


def test_it_keeps_bleu_within_0_and_1_for_an_identical_answer():
    answer = "Order 3 contains three items: two blue shirts and a red hat."
    assert metrics.bleu(answer, answer) == 1.0  # sacrebleu gives 100.00000000000004


def test_it_gives_partial_credit_to_a_partly_different_answer_in_cyrillic_and_cjk():
    assert 0 < metrics.rouge_l("Заказ содержит две зелёные рубашки.", ANSWERS["cyrillic"]) < 1
    assert 0 < metrics.rouge_l("订单四十二包含三件绿色衬衫。", ANSWERS["chinese"]) < 1
    # BLEU's default 13a tokenizer sees a CJK sentence as one word: any difference would score 0.
    assert 0 < metrics.bleu("订单四十二包含两件蓝色衬衫。", ANSWERS["chinese"]) < 1
    assert 0 < metrics.bleu("注文には青いシャツが二枚入っています。", ANSWERS["japanese"]) < 1


def test_it_keeps_latin_scoring_case_insensitive_and_word_based():
    assert metrics.rouge_l("The Cat SAT", "the cat sat") == pytest.approx(1.0)
    assert metrics.rouge_l("ПРИВЕТ мир", "привет МИР") == pytest.approx(1.0)
    # Words, not characters: "cat" and "cut" share no token.
    assert metrics.rouge_l("cat", "cut") == 0.0
    assert metrics.rouge_tokens("Hello, wörld! 你好 naïve_1") == ["hello", "wörld", "你", "好", "naïve_1"]
    assert metrics.rouge_tokens("हिन्दी भाषा") == ["हिन्दी", "भाषा"]  # vowel signs stay inside their word


def test_it_treats_canonically_equal_text_as_an_exact_match():
    composed, decomposed = "café", "cafe\u0301"
    assert metrics.exact_match(composed, decomposed) == 1.0
    assert metrics.rouge_l(composed, decomposed) == pytest.approx(1.0)
