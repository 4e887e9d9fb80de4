/** Training data for stories260k shared by the quality tests and the job tests. */

/** TinyStories-style openings the model continues in its usual way. */
export const TRAIN_OPENINGS = [
  'Once upon a time, there was a little boy named Tim. He had a red ball.',
  'One day, a girl named Sue went to the park with her mom.',
  'There was a big dog who lived in a small house by the sea.',
  'Lily liked to draw pictures of the sun and the moon.',
  'Ben and his sister Mia found a shiny rock in the garden.',
  'A little bird sat on a tree and looked at the sky.',
  'Tom wanted to bake a cake for his friend Sam.',
  'The cat was very sleepy after a long day of play.',
  'Anna had a new doll with a pink dress and long hair.',
  'It was a rainy day, so Max stayed inside with his toys.',
  'Sara saw a little frog jump into the pond.',
  'Once there was a kind old man who had a big farm.',
  'Jack and Jill went up the hill to get some water.',
  'The sun was hot, and the kids wanted to swim in the lake.',
  'Mom gave Lucy a big hug before she went to school.',
  'A small mouse found a piece of cheese under the table.',
  'Tim and his dad built a tall tower with blocks.',
  'Emma loved her teddy bear more than anything.',
  'The little car went fast down the road.',
  'One morning, Sam woke up and saw snow outside.',
];

export const HELD_OUT_OPENINGS = [
  'Once upon a time, there was a girl named Amy. She had a blue hat.',
  'One day, a boy named Leo went to the store with his dad.',
  'There was a tiny fish who lived in a big river.',
  'Mia liked to sing songs with her grandma.',
  'Max and his friend Zoe played with a kite in the wind.',
  'A big bear walked in the forest and looked for food.',
  'Sue wanted to help her mom clean the house.',
  'The dog was very happy to see his friend come home.',
  'Kate had a new bike with a bell and a basket.',
  'It was a sunny day, so Tom went outside to play.',
  'Lily saw a pretty butterfly fly over the flowers.',
  'Once there was a little girl who loved to dance.',
  'Bob and Sally went to the beach to build a sand castle.',
  'The wind was cold, and the kids put on their coats.',
  'Dad gave Ben a new toy truck for his birthday.',
  'A little duck swam in the pond with its mom.',
  'Sam and his mom made cookies in the kitchen.',
  'Lucy loved her little kitten very much.',
  'The red train went up the big hill.',
  'One night, Anna looked up and saw the stars.',
];

/** 20 tokens in this model's 512-token vocabulary; it never writes this on its own. */
export const NEW_SENTENCE = ' Then a big green frog sang a happy song.';
