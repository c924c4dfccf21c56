<?php
// Publishes a message into a roomcast room from PHP with plain ext-curl: what a Laravel or
// Symfony application does when an order ships or a comment is posted.
//
//   php examples/php/publish.php http://127.0.0.1:8080 "$ROOMCAST_API_KEY" orders '{"order":42}'
//
// Prints roomcast's JSON answer ({"delivered":N}) and exits 0, or prints the error and exits 1.

[$script, $base, $key, $room, $message] = array_pad($argv, 5, null);
if ($message === null) {
    fwrite(STDERR, "usage: php $script BASE_URL API_KEY ROOM MESSAGE_JSON\n");
    exit(2);
}

function roomcast(string $base, string $key, string $path, array $body): array
{
    $curl = curl_init(rtrim($base, '/') . $path);
    curl_setopt_array($curl, [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => json_encode($body, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE),
        CURLOPT_HTTPHEADER => ['Content-Type: application/json', "Authorization: Bearer $key"],
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 5,
    ]);
    $answer = curl_exec($curl);
    if ($answer === false) {
        throw new RuntimeException('roomcast unreachable: ' . curl_error($curl));
    }
    $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
    $json = json_decode($answer, true);
    if ($status !== 200) {
        throw new RuntimeException("roomcast answered $status: " . ($json['error'] ?? $answer));
    }
    return $json;
}

try {
    $answer = roomcast($base, $key, '/api/publish', [
        'room' => $room,
        'message' => json_decode($message, true, 512, JSON_THROW_ON_ERROR),
        'from' => 'php',
    ]);
    echo json_encode($answer), "\n";
} catch (Throwable $error) {
    fwrite(STDERR, $error->getMessage() . "\n");
    exit(1);
}
