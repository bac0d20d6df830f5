"""Writes docs/examples/traffic.jsonl: a working day of requests, Korean and English, of the kinds
the seed's rules tell apart (coding keywords, a request for a quick answer, prompts over 2,000
characters, plain questions, a few naming a backend directly), with times, for
`dreamseed policies diff --traffic`. Deterministic: run it again and the file is the same.

    python3 docs/examples/make_traffic.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

QUESTIONS = {
    "plain": [
        "How do I reset my password?", "What are the office hours on Friday?", "Summarise our refund policy.",
        "Who approves travel requests?", "Where is the VPN guide?", "What does the error 'quota exceeded' mean?",
        "비밀번호를 재설정하려면 어떻게 하나요?", "휴가 신청은 어디에서 하나요?", "환불 정책을 요약해 주세요.",
        "회의실 예약은 어떻게 하나요?", "사내 와이파이 비밀번호가 뭐예요?", "출장비 정산 절차를 알려 주세요.",
    ],
    "code": [
        "Write a Python function that parses ISO dates.", "Why does this SQL query return duplicates?",
        "Refactor this JavaScript class to use async/await.", "Explain this regex: ^[a-z]+$",
        "Help me debug a segfault in my Rust program.", "What algorithm finds the shortest path in a graph?",
        "파이썬으로 정렬 코드를 작성해 주세요.", "이 함수가 왜 None을 반환하는지 디버깅해 주세요.",
        "자바 클래스 설계를 검토해 주세요.", "이진 탐색 알고리즘을 설명해 주세요.",
    ],
    "fast": [
        "Quick answer please: capital of Australia?", "Give me a fast summary of this week's outage.",
        "quickly: how many days in a leap year?", "빠른 답변 부탁해요: 서울의 인구는?", "간단히 설명해 주세요: DNS란?",
        "빨리 알려 주세요, 오늘 회의 몇 시예요?",
    ],
}
PASTE = ("The deployment log shows the proxy restarting after the health check failed three times in a row; "
         "the model server answered 503 while it loaded its weights, and the fallback took the traffic. ")
PASTE_KO = ("배포 로그를 보면 상태 확인이 세 번 연속 실패한 뒤 프록시가 다시 시작되었고, "
            "모델 서버는 가중치를 불러오는 동안 503을 응답했습니다. ")


def request(rng: random.Random, kind: str) -> dict[str, object]:
    if kind == "long":
        korean = rng.random() < 0.4
        paste = (PASTE_KO if korean else PASTE) * rng.randint(14 if korean else 12, 24)
        ask = "이 로그에서 원인을 찾아 주세요." if korean else "What went wrong in this log?"
        return {"model": "auto", "messages": [{"role": "user", "content": f"{paste}\n\n{ask}"}]}
    if kind == "direct":
        return {"model": rng.choice(["fast", "general", "microsoft/Phi-3-mini-4k-instruct"]),
                "messages": [{"role": "user", "content": rng.choice(QUESTIONS["plain"])}]}
    body: dict[str, object] = {"model": "auto", "messages": [
        {"role": "system", "content": "You are the team's assistant."},
        {"role": "user", "content": rng.choice(QUESTIONS[kind])}]}
    if rng.random() < 0.15:  # a later turn: the question is the last of several messages
        body["messages"] = [*body["messages"], {"role": "assistant", "content": "Sure."},  # type: ignore[misc]
                            {"role": "user", "content": "Thanks, and one more thing about that."}]
    if rng.random() < 0.1:
        body = {"model": "auto", "prompt": rng.choice(QUESTIONS[kind])}  # a /v1/completions body
    return body


def main() -> None:
    rng = random.Random(20261207)
    start = 1_796_000_000.0  # a Monday, 09:00 in Seoul, as Unix time
    kinds = ["plain"] * 50 + ["code"] * 22 + ["fast"] * 14 + ["long"] * 8 + ["direct"] * 6
    lines, ts = [], start
    for _ in range(400):
        ts += rng.expovariate(1 / 81)  # about nine hours of traffic
        lines.append(json.dumps({"ts": round(ts, 3), **request(rng, rng.choice(kinds))}, ensure_ascii=False))
    (Path(__file__).parent / "traffic.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
